"""Build the Keras test models of tests/data/tf2onnx (needs tensorflow-cpu + tf2onnx in a
separate venv: python -m venv /tmp/tfvenv && /tmp/tfvenv/bin/pip install tensorflow-cpu tf2onnx;
then /tmp/tfvenv/bin/python models/build_keras.py). Not run by CI."""
import os, sys, subprocess
os.environ["TF_CPP_MIN_LOG_LEVEL"]="2"
import numpy as np, tensorflow as tf, keras
from keras import layers
keras.utils.set_random_seed(0)
D="/tmp/tf_models"
def randomize_bn(m):
    for l in m.layers:
        if isinstance(l, layers.BatchNormalization):
            ws=l.get_weights()
            n=ws[0].shape
            l.set_weights([np.random.uniform(0.5,1.5,n).astype("float32"),np.random.normal(0,0.1,n).astype("float32"),
                           np.random.normal(0,0.1,n).astype("float32"),np.random.uniform(0.5,1.5,n).astype("float32")])
def cnn_res():
    i=keras.Input((32,32,3),name="input")
    x=i
    def cbr(x,c,s=1):
        x=layers.Conv2D(c,3,strides=s,padding="same")(x); x=layers.BatchNormalization()(x); return layers.ReLU()(x)
    x=cbr(x,16); y=cbr(x,32); y=cbr(y,16); x=layers.Add()([x,y])
    x=layers.DepthwiseConv2D(3,padding="same")(x); x=layers.BatchNormalization()(x); x=layers.ReLU()(x)
    x=cbr(x,32,2)
    x=layers.GlobalAveragePooling2D()(x); o=layers.Dense(10)(x)
    return keras.Model(i,o)
def cnn_flat():
    i=keras.Input((32,32,3),name="input")
    x=layers.Conv2D(16,3,padding="same",activation="relu")(i); x=layers.MaxPooling2D()(x)
    x=layers.Conv2D(32,3,padding="same",activation="relu")(x); x=layers.MaxPooling2D()(x)
    x=layers.Flatten()(x); x=layers.Dense(64,activation="relu")(x); o=layers.Dense(10)(x)
    return keras.Model(i,o)
def mnv2():
    return keras.applications.MobileNetV2(weights=None,input_shape=(64,64,3),classes=10)
def lstm():
    i=keras.Input((20,),dtype="int32",name="tokens")
    x=layers.Embedding(1000,16)(i); x=layers.LSTM(32)(x); x=layers.Dense(32,activation="relu")(x); o=layers.Dense(5)(x)
    return keras.Model(i,o)
for name,fn in [("cnn_res",cnn_res),("cnn_flat",cnn_flat),("mobilenetv2",mnv2),("lstm",lstm)]:
    if len(sys.argv)>1 and name not in sys.argv[1:]: continue
    m=fn(); randomize_bn(m)
    sm=f"{D}/{name}_sm"
    m.export(sm)  # keras3 SavedModel export
    r=subprocess.run([sys.executable,"-m","tf2onnx.convert","--saved-model",sm,"--output",f"{D}/{name}.onnx","--opset","17"],capture_output=True,text=True)
    print(name,"rc",r.returncode); print(r.stderr[-1500:] if r.returncode else r.stderr[-300:])
